"""ftune: fine-tune ImageNet-pretrained image classifiers, as a library, a command and a service.

The engine is ``ftune.models`` (pure ML: ``from ftune.models import fit, Predictor``), the HTTP
API ``ftune.service`` and the training workers ``ftune.workers``. Nothing is imported eagerly
here, so ``import ftune.models`` loads neither the service nor torch.
"""

__version__ = "0.1.0"
