"""`blt train` subcommand: argument definitions (torch-free) and the handler."""

from __future__ import annotations

import argparse


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", help="(being written)")
