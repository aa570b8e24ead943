"""What both entry points do: parse and validate settings, set up logging, run the loop, and turn
failures into one clear line and an exit code (2: bad settings, 1: the node could not run)."""

from __future__ import annotations

import logging

from distill.cliconfig import ConfigError

log = logging.getLogger("neurons")


def run_neuron(role: str, config_model, node_class, argv: list[str] | None, doc: str | None) -> int:
    from neurons.config import parse_config
    from neurons.logs import setup_logging

    prog = f"python neurons/{role}.py"
    cfg = parse_config(config_model, argv, prog, (doc or "").strip())
    from neurons.chain import ChainError  # after parsing: `--help` and bad flags stay quick
    from neurons.state import StateError
    from neurons.store import StoreError

    setup_logging(
        debug=cfg.logging.debug, trace=cfg.logging.trace, json_logs=cfg.logging.format == "json", role=role
    )
    log.info(
        "%s starting on subnet %d (%s)",
        role,
        cfg.netuid,
        cfg.subtensor.chain_endpoint or cfg.subtensor.network,
    )
    try:
        node = node_class(cfg)
    except (ChainError, ConfigError, StateError, StoreError) as e:
        log.error("%s cannot start: %s", role, e)
        return 1
    rounds = node.run()
    log.info("%s stopped after %d round(s)", role, rounds)
    return 0
