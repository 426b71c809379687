"""Step 7: volume, CT attenuation, Dixon fat ratio, Dice, QC flags, agreement with experts, and the DuckDB
store."""
