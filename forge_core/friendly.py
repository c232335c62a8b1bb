"""Errors are for people: a command wrapped in friendly() ends a ForgeError with one line on stderr and exit code 2,
no traceback (under a launcher rank 0 speaks for all)."""

from __future__ import annotations

import functools
import sys

import click

from forge_core.errors import ForgeError


def friendly(f):
    """Turn ForgeError (and a few well-known OS errors) into one line on stderr, exit 2."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except ForgeError as e:
            from forge_core.distributed import PeerLost, env_rank  # here: `forge --help` stays numpy-free

            # under a launcher rank 0 speaks for all (every rank stops on the same agreed error); another rank
            # speaks only when it lost the others (then rank 0 may be the one that is gone)
            if env_rank() == 0 or isinstance(e, PeerLost):
                click.echo(f"forge: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            from forge_core.distributed import env_rank

            if env_rank() == 0:
                click.echo("forge: interrupted", err=True)
            sys.exit(130)

    return wrapper
