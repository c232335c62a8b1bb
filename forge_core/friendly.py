"""Errors are for people: a command wrapped in friendly() ends a ForgeError with one line on stderr and exit code 2,
no traceback (under a launcher rank 0 speaks for all)."""

from __future__ import annotations

import functools
import sys

import click

from forge_core.errors import ForgeError


def friendly(f):
    """Turn ForgeError (and a few well-known OS errors) into one line on stderr, exit 2 (a polite stop on a
    signal: 128 + the signal's number, as the shell reports a process that signal ended)."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from forge_core import rank_status

        try:
            out = f(*args, **kwargs)
        except ForgeError as e:
            from forge_core.distributed import PeerLost, env_rank  # here: `forge --help` stays numpy-free

            # under a launcher rank 0 speaks for all (every rank stops on the same agreed error); another rank
            # speaks only when it lost the others (then rank 0 may be the one that is gone)
            speaks = env_rank() == 0 or isinstance(e, PeerLost)
            if speaks:
                click.echo(f"forge: error: {e}", err=True)
            rc = getattr(e, "exit_code", 2)  # 2; a stop on a signal: the shell's 128 + its number
            rank_status.write(rc, str(e), printed=speaks, peer_lost=isinstance(e, PeerLost))
            sys.exit(rc)
        except KeyboardInterrupt:
            from forge_core.distributed import env_rank

            if env_rank() == 0:
                click.echo("forge: interrupted", err=True)
            rank_status.write(130, "interrupted", printed=env_rank() == 0)
            sys.exit(130)
        except Exception as e:  # a bug: the traceback is for us; the launching process gets the one line
            rank_status.write(1, f"{type(e).__name__}: {e}")
            raise
        rank_status.write(0)
        return out

    return wrapper
