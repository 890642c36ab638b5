"""Fleet control: publish artifacts, staged rollouts, device commands, the collector and its
database, the live views and the HTML report, and the local demo. Torch-free."""
