"""Secure aggregation (Bonawitz et al. 2017, SecAgg+ of Bell et al. 2020): the cryptographic building blocks."""
