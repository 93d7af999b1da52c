"""placeholder"""
from .backend import Backend
class BlasBackend(Backend):
    name = "blas"
    description = "compiled core (not built yet)"
    default_priority = 10
    def availability(self):
        return False, "not built"
