"""Training objectives: the ``objective`` config (:mod:`.config`), noise schedules and ELBO weights
(:mod:`.noise`), AR / LLaDA diffusion / SFT losses and their dispatch (:mod:`.losses`) and block diffusion
(:mod:`.block_diffusion`)."""
