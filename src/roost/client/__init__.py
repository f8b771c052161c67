"""Client libraries (QUIC) used by the tests, the benchmarks and ``roost bench``."""
