from rlxf.cli import entry

entry()
