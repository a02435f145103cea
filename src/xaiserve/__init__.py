"""xaiserve: prediction, attribution maps and their reliability in one gRPC call.

Layers, imported in one direction (``tests/test_import_contract.py`` checks it):
``api`` (the wire contract, torch-free) <- ``gateway`` and ``worker`` and ``engine``;
``engine`` -> ``reliability``, ``methods`` -> ``runtime`` (the served model and its counted
forward) -> ``api``; ``offline`` uses the engine; ``model_store`` builds archives and the
demo model.
"""
