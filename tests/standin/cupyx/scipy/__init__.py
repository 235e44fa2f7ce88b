"""``cupyx.scipy`` of the stand-in: only ``special.erf``."""
