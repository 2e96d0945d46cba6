"""`python -m turboflow.functions.t2v.function`: func-python's serve(new) contract with /metrics and the guard."""

from turboflow.functions.app import serve

from .func import new

serve(new)
