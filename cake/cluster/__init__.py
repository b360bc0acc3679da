"""A cluster without hand work: measuring workers, placing blocks, pushing tensors, empty workers
and their planning, worker processes on this machine."""
