"""Make the package's INFO logs visible in Ray processes.

A Serve replica configures only Serve's own logger (``ray.serve``) and a plain actor configures
none, so ``expertpool.*`` INFO lines (``engine ready ...``, one line per checkpoint shard, worker
loads, recoveries) would be dropped at the root logger's WARNING level. ``show_info_logs`` gives the
``expertpool`` logger level INFO and a handler: in a replica, Serve's own handlers (the line lands
in the replica's log file with Serve's format and request context); elsewhere, stderr (an actor's
``worker-*.err`` file, which Ray also streams to the driver). Idempotent.
"""

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def show_info_logs(use_serve_handlers: bool = False) -> logging.Logger:
    logger = logging.getLogger("expertpool")
    logger.setLevel(logging.INFO)
    if logger.handlers:
        return logger
    handlers = list(logging.getLogger("ray.serve").handlers) if use_serve_handlers else []
    if not handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(FORMAT))
        handlers = [h]
    for h in handlers:
        logger.addHandler(h)
    logger.propagate = False  # the root logger of a Ray worker would print it a second time
    return logger
