"""`blt eval` and `blt data` subcommands: argument definitions (torch-free) and handlers."""

from __future__ import annotations

import argparse


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", help="(being written)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", help="(being written)")
