"""Build the daemon's :class:`~pacs_ai.route.rules.Router` from the configuration and the model card."""

from __future__ import annotations

from pacs_ai.config import RoutingConfig
from pacs_ai.infer.model_card import ModelCard
from pacs_ai.route.intended_use import intended_use_rules
from pacs_ai.route.rules import Router, rules_from_tables

__all__ = ["build_router"]


def build_router(routing: RoutingConfig, card: ModelCard | None) -> Router:
    """Configured rules, then (``routing.intended_use``) the criteria of ``card.intended_use``.

    Raises ModelError when the card's ``intended_use`` section is malformed.
    """
    criteria = intended_use_rules(card.intended_use) if (card is not None and routing.intended_use) else ()
    return Router(rules_from_tables(routing.rules), criteria, routing.unknown_body_part)
