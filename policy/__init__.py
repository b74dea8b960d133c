"""nemo-eks policy pack. The policies are in ``policy.rules`` (importable without side effects); ``__main__.py``
serves them to the Pulumi engine."""
