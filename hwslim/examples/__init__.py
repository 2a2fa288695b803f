"""Example models for the README's "Your own model" section (``--model hwslim.examples.tiny_cnn:build``)."""
