"""Memory planning (issue 7): model shapes from configs; the planner builds on them."""
