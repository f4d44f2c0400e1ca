"""SAEBench adapters: wrappers, loaders, export and the eval runner."""
