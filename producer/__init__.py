"""What starts work: the command line, run registry, inputs, backpressure, status."""
