"""The run configuration: registries, the resolved config with its value rules, and the flags made from them."""
