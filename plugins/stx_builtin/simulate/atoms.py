"""Atomic and molecular constants of the simulator (standard values, no fitting).

* Solar abundances: Asplund, Grevesse, Sauval & Scott 2009, ARA&A 47, 481 (photospheric; the
  meteoritic value where no photospheric one exists: Cs, U).
* First and second ionisation potentials (eV): NIST Atomic Spectra Database.
* Partition functions ``U_I, U_II``: rounded values near 5000 K (Gray, *The Observation and
  Analysis of Stellar Photospheres*, Appendix D, and Irwin 1981 for the heavy elements). The
  simulator keeps them constant in temperature; they only set each species' relative strength.
* Hydrogen: Rydberg formula (vacuum wavelengths) and the hydrogenic oscillator strengths of
  Wiese & Fuhr (2009) for the first members, a ``n**-3`` tail beyond.
* Lines blueward of 4200 A (not in the Gaia-ESO list): Ca II H&K, Al I, Mg I, Sr II, Mn I, Fe I,
  Ti II, Si I with air wavelengths, excitation and log gf from the NIST ASD (rounded).
* Molecular band heads (air, A): TiO (Pearse & Gaydon; Valenti et al. 1998), CH A-X G band.
"""

from __future__ import annotations

import numpy as np

#: symbol: (Z, A_sun (log eps, H = 12), chi_I eV, chi_II eV, U_I, U_II)
ELEMENTS: dict[str, tuple[int, float, float, float, float, float]] = {
    "H": (1, 12.00, 13.598, 0.0, 2.0, 1.0),
    "He": (2, 10.93, 24.587, 54.42, 1.0, 2.0),
    "Li": (3, 1.05, 5.392, 75.64, 2.1, 1.0),
    "C": (6, 8.43, 11.260, 24.38, 9.3, 5.9),
    "O": (8, 8.69, 13.618, 35.12, 8.7, 4.0),
    "Na": (11, 6.24, 5.139, 47.29, 2.0, 1.0),
    "Mg": (12, 7.60, 7.646, 15.04, 1.0, 2.0),
    "Al": (13, 6.45, 5.986, 18.83, 5.8, 1.0),
    "Si": (14, 7.51, 8.152, 16.35, 9.4, 5.6),
    "S": (16, 7.12, 10.360, 23.34, 8.4, 4.1),
    "K": (19, 5.03, 4.341, 31.63, 2.1, 1.0),
    "Ca": (20, 6.34, 6.113, 11.87, 1.2, 2.2),
    "Sc": (21, 3.15, 6.561, 12.80, 11.0, 22.0),
    "Ti": (22, 4.95, 6.828, 13.58, 30.0, 55.0),
    "V": (23, 3.93, 6.746, 14.66, 40.0, 35.0),
    "Cr": (24, 5.64, 6.767, 16.49, 10.0, 7.0),
    "Mn": (25, 5.43, 7.434, 15.64, 6.0, 7.5),
    "Fe": (26, 7.50, 7.902, 16.19, 25.0, 42.0),
    "Co": (27, 4.99, 7.881, 17.08, 30.0, 28.0),
    "Ni": (28, 6.22, 7.640, 18.17, 29.0, 10.0),
    "Cu": (29, 4.19, 7.726, 20.29, 2.3, 1.0),
    "Zn": (30, 4.56, 9.394, 17.96, 1.0, 2.0),
    "Ga": (31, 3.04, 5.999, 20.51, 4.6, 1.0),
    "Ge": (32, 3.65, 7.899, 15.93, 7.0, 3.0),
    "Rb": (37, 2.52, 4.177, 27.29, 2.2, 1.0),
    "Sr": (38, 2.87, 5.695, 11.03, 1.3, 2.1),
    "Y": (39, 2.21, 6.217, 12.24, 10.0, 13.0),
    "Zr": (40, 2.58, 6.634, 13.13, 30.0, 40.0),
    "Nb": (41, 1.46, 6.759, 14.32, 40.0, 35.0),
    "Mo": (42, 1.88, 7.092, 16.16, 7.0, 8.0),
    "Ru": (44, 1.75, 7.360, 16.76, 30.0, 25.0),
    "Rh": (45, 0.91, 7.459, 18.08, 20.0, 15.0),
    "In": (49, 0.80, 5.786, 18.87, 2.5, 1.0),
    "Cs": (55, 1.08, 3.894, 23.16, 2.3, 1.0),
    "Ba": (56, 2.18, 5.212, 10.00, 2.6, 4.4),
    "La": (57, 1.10, 5.577, 11.06, 30.0, 25.0),
    "Ce": (58, 1.58, 5.539, 10.85, 100.0, 120.0),
    "Pr": (59, 0.72, 5.473, 10.55, 40.0, 40.0),
    "Nd": (60, 1.42, 5.525, 10.73, 50.0, 60.0),
    "Sm": (62, 0.96, 5.644, 11.07, 40.0, 60.0),
    "Eu": (63, 0.52, 5.670, 11.24, 9.0, 15.0),
    "Gd": (64, 1.07, 6.150, 12.09, 30.0, 40.0),
    "Tb": (65, 0.30, 5.864, 11.52, 40.0, 40.0),
    "Dy": (66, 1.10, 5.939, 11.67, 20.0, 25.0),
    "Ho": (67, 0.48, 6.022, 11.80, 20.0, 20.0),
    "Er": (68, 0.92, 6.108, 11.93, 20.0, 25.0),
    "Tm": (69, 0.10, 6.184, 12.05, 10.0, 15.0),
    "Lu": (71, 0.10, 5.426, 13.90, 5.0, 1.5),
    "W": (74, 0.85, 7.864, 16.10, 20.0, 15.0),
    "Os": (76, 1.40, 8.438, 17.00, 15.0, 20.0),
    "Tl": (81, 0.90, 6.108, 20.43, 2.0, 1.0),
    "Th": (90, 0.02, 6.307, 11.50, 40.0, 60.0),
    "U": (92, -0.54, 6.194, 11.60, 40.0, 40.0),
}

#: Elements whose abundance follows [alpha/Fe] (on top of [Fe/H]).
ALPHA = frozenset({"O", "Mg", "Si", "S", "Ca", "Ti"})

#: Electron donors of the photosphere: (A_sun, chi_I, U_II / U_I, alpha?) for the elements
#: that supply most free electrons in cool stars.
DONORS = tuple(
    (ELEMENTS[s][1], ELEMENTS[s][2], ELEMENTS[s][5] / ELEMENTS[s][4], s in ALPHA)
    for s in ("Na", "Mg", "Al", "Si", "K", "Ca", "Cr", "Mn", "Fe", "Ni", "Ti", "C")
)

#: Helium to hydrogen number ratio.
HE_H = 10 ** (ELEMENTS["He"][1] - 12.0)

#: Strong lines blueward of the Gaia-ESO list (air A, element, ion, chi eV, log gf).
BLUE_LINES: tuple[tuple[float, str, int, float, float], ...] = (
    (3933.663, "Ca", 2, 0.000, 0.135),
    (3968.469, "Ca", 2, 0.000, -0.180),
    (3944.006, "Al", 1, 0.000, -0.640),
    (3961.520, "Al", 1, 0.014, -0.340),
    (3829.355, "Mg", 1, 2.709, -0.210),
    (3832.304, "Mg", 1, 2.712, 0.270),
    (3838.292, "Mg", 1, 2.717, 0.490),
    (4077.709, "Sr", 2, 0.000, 0.150),
    (4030.753, "Mn", 1, 0.000, -0.470),
    (4033.062, "Mn", 1, 0.000, -0.618),
    (4034.483, "Mn", 1, 0.000, -0.811),
    (3759.291, "Ti", 2, 0.607, 0.280),
    (3761.320, "Ti", 2, 0.574, 0.180),
    (3905.523, "Si", 1, 1.909, -1.090),
    (3734.864, "Fe", 1, 0.859, 0.320),
    (3737.131, "Fe", 1, 0.052, -0.570),
    (3745.561, "Fe", 1, 0.087, -0.770),
    (3748.262, "Fe", 1, 0.110, -1.010),
    (3749.485, "Fe", 1, 0.915, 0.160),
    (3758.233, "Fe", 1, 0.958, -0.030),
    (3763.789, "Fe", 1, 0.990, -0.220),
    (3767.192, "Fe", 1, 1.011, -0.390),
    (3795.002, "Fe", 1, 0.990, -0.760),
    (3815.840, "Fe", 1, 1.485, 0.240),
    (3820.425, "Fe", 1, 0.859, 0.120),
    (3825.881, "Fe", 1, 0.915, -0.040),
    (3827.823, "Fe", 1, 1.557, 0.060),
    (3859.911, "Fe", 1, 0.000, -0.710),
    (3886.282, "Fe", 1, 0.052, -1.080),
    (3899.707, "Fe", 1, 0.087, -1.530),
    (3920.258, "Fe", 1, 0.121, -1.750),
    (3922.912, "Fe", 1, 0.052, -1.650),
    (3927.920, "Fe", 1, 0.110, -1.520),
    (3930.297, "Fe", 1, 0.087, -1.490),
    (4045.812, "Fe", 1, 1.485, 0.280),
    (4063.594, "Fe", 1, 1.557, 0.060),
    (4071.738, "Fe", 1, 1.608, -0.020),
    (4132.058, "Fe", 1, 1.608, -0.680),
    (4143.868, "Fe", 1, 1.557, -0.510),
    (4005.242, "Fe", 1, 1.557, -0.610),
    (4062.441, "Fe", 1, 2.845, -0.860),
    (4118.545, "Fe", 1, 3.573, 0.280),
    (4187.039, "Fe", 1, 2.449, -0.550),
    (4191.431, "Fe", 1, 2.469, -0.670),
    (3961.144, "Ca", 1, 1.886, -0.900),
    (4098.519, "Ca", 1, 2.526, -0.540),
)

# Hydrogen ----------------------------------------------------------------------------------
RYDBERG_H_CM = 109677.583  # cm^-1, hydrogen (reduced-mass) Rydberg constant
CHI_H_LEVEL = {2: 10.199, 3: 12.088}  # excitation of n = 2, 3 (eV)
#: Absorption oscillator strengths f(lower -> upper) (Wiese & Fuhr 2009).
F_BALMER = {3: 0.6407, 4: 0.1193, 5: 0.04467, 6: 0.02209, 7: 0.01270, 8: 0.008036, 9: 0.005429, 10: 0.003851}
F_PASCHEN = {4: 0.8421, 5: 0.1506, 6: 0.05584, 7: 0.02768, 8: 0.01604, 9: 0.01023, 10: 0.006980}


def hydrogen_lines(lower: int, n_max: int) -> list[tuple[float, int, float]]:
    """``(vacuum wavelength A, upper level, f)`` of the series from ``lower`` up to ``n_max``."""
    table = F_BALMER if lower == 2 else F_PASCHEN
    last = max(table)
    out = []
    for n in range(lower + 1, n_max + 1):
        wn = RYDBERG_H_CM * (1.0 / lower**2 - 1.0 / n**2)
        f = table.get(n, table[last] * (last / n) ** 3)
        out.append((1e8 / wn, n, f))
    return out


def series_limit(lower: int) -> float:
    return 1e8 / (RYDBERG_H_CM / lower**2)


# Molecules ---------------------------------------------------------------------------------
#: TiO band heads (air A) with relative strength and e-folding length (A) of the band towards
#: the red (the bands of TiO degrade to the red).
TIO_BANDS: tuple[tuple[float, float, float], ...] = (
    (4761.0, 0.5, 60.0), (4954.6, 0.8, 90.0), (5166.7, 0.9, 80.0), (5448.0, 0.8, 80.0),
    (5597.0, 0.4, 60.0), (5847.0, 0.6, 70.0), (6158.7, 0.9, 70.0), (6187.0, 0.6, 50.0),
    (6651.0, 0.9, 80.0), (6681.0, 0.7, 60.0), (7053.9, 1.0, 110.0), (7087.6, 0.9, 90.0),
    (7125.5, 0.8, 90.0), (7589.0, 0.5, 60.0), (7666.0, 0.6, 70.0), (8206.0, 0.3, 60.0),
    (8432.0, 0.6, 70.0), (8442.0, 0.5, 50.0), (8452.0, 0.4, 50.0), (8859.0, 0.5, 70.0),
    (9209.0, 0.4, 80.0),
)
TIO_D0 = 6.87  # eV, dissociation energy
#: CH A-X (G band): the strong Q-branch head near 4314 A; the band degrades to the violet.
CH_BAND = (4314.2, 45.0)  # head (air A), e-folding length to the blue (A)
CH_D0 = 3.47


def element_arrays(symbols: np.ndarray) -> dict[str, np.ndarray]:
    """Per-line arrays of the element constants for an array of element symbols."""
    table = {k: np.array([ELEMENTS[str(s)][i] for s in symbols]) for i, k in
             enumerate(("z", "a_sun", "chi1", "chi2", "u1", "u2"))}
    table["alpha"] = np.array([str(s) in ALPHA for s in symbols])
    return table
