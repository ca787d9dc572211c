"""Real deployment of fedloom: a server and client processes over gRPC.

``certs`` makes a development certificate authority for mutual TLS and enrollment tokens;
``state`` keeps the server's crash-safe state (runs, rounds, checkpoints, client registry) in SQLite.
"""
