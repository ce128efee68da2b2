"""The components a contributor adds to: one registered function each, in the file of its kind."""
