"""Reading finished runs back for figures: their per-epoch and per-step logs, and their predictions."""
