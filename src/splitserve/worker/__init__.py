"""The worker core shared by both roles (engine, registry, transfer) and the role logic."""
