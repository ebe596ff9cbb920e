"""The command line: the only argparse, rich and print code of konbini; one module per command group."""
