"""captioning: an image-captioning pipeline from data to service.

The library is plain Python and torch. Prefect, MLflow and BentoML are imported
only inside the functions that need them, so it runs anywhere torch does.
"""

import os

# OpenMP threads that spin while waiting make torch many times slower whenever another busy
# process shares the CPU (a server, a data loader, a second job); set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
