"""Training: the loop (:mod:`.trainer`), DeepSpeed setup (:mod:`.engine`), resuming and world-size changes
(:mod:`.resume`), loss guards (:mod:`.guards`), stop signals (:mod:`.signals`), metrics and MFU (:mod:`.metrics`),
learning-rate schedules (:mod:`.schedule`), validation samples (:mod:`.samples`) and the run config
(:mod:`.config`)."""
