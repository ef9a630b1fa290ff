"""Shared test code, imported by the test modules as `helpers.<module>` (tests/ is on sys.path):
tiny configs (`tiny`), tiny random transformers models (`torch_models`), killed-and-resumed runs (`processes`),
terratorch's model files without its package __init__s (`terratorch`). Test modules never import conftest or
each other; fixtures stay in conftest.py."""
