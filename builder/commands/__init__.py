"""The builder's commands, one module each; builder/cli.py gathers them into the group that
the `edgefleet` command (agent/clikit.py) lists with the fleet's.

Each module here holds the click layer of one command and imports the builder modules that do
the work only when it runs, so listing the commands stays quick.
"""
