"""A cluster without hand work: measuring workers, placing blocks, pushing tensors, empty workers, local worker processes."""
