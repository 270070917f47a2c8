"""Every module below registers its methods on import (see slimtune.registry.load_all)."""
