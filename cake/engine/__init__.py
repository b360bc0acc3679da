"""Moving hidden states through the model for sessions: the session store and the block runner
(the master's and every worker's), stages (local and remote), the pipeline of stages and its
re-planning, the master's sessions and the one step scheduler."""
