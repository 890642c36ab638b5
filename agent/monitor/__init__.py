"""On-device drift monitoring in fixed memory against the artifact's reference profile."""
