"""Import the package first: it sets OpenMP's passive waiting before torch loads."""

import relion_graphsplit  # noqa: F401
