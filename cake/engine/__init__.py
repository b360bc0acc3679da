"""Running blocks for sessions: the session store, stages (local and remote), building them from a topology, and re-planning."""
