import sys

try:
    from hwslim.cli import entry
except KeyboardInterrupt:  # Ctrl-C before the CLI's own handling is in place
    print("hwslim: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(entry())
