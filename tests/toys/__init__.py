"""Operators defined outside hwslim, one file each, as a user would add one."""
