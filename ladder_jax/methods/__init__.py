"""The papers' own tools on top of the model: Sync-Point Drop (spd) and Layer Parallelism (lp)."""
