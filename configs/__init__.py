"""The shipped configs, installed as the package `jaxvit.configs` (`jaxvit configs` lists them)."""
