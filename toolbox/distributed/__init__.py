"""Ray: starting or joining a cluster, the storage Ray writes through, and the one place a TorchTrainer is built."""
