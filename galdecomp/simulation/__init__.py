"""Simulated multi-frequency Galactic sky (radio to gamma rays) with known truth.

`simulate_sky` draws latent physical maps (gas, cosmic rays, electrons, dust, ionised and hot
gas, CMB) and evaluates 35 survey-like channels from them, with Gaussian or Poisson noise;
`morphology` swaps the components' random amplitude maps for real spatial templates;
`write_simulated_sky` writes the maps and truth maps as catalogs; `plot_overview` draws the
channels.
"""
from .components import Galaxy, make_galaxy
from .morphology import TARGETS, Morphology, resolve_morphology
from .sky import (ComponentMaps, SimulatedSky, channel_components, channel_table_path,
                  describe_morphology, load_channel_table, plot_overview, simulate_sky,
                  write_simulated_sky)

__all__ = ["simulate_sky", "write_simulated_sky", "plot_overview", "SimulatedSky",
           "ComponentMaps", "channel_components", "channel_table_path", "load_channel_table",
           "Galaxy", "make_galaxy", "TARGETS", "Morphology", "resolve_morphology",
           "describe_morphology"]
