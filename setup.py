"""Builds imaml_ext and its compiled operators (imaml_ext._C).

The CPU kernels are always built. The CUDA kernels are built when torch is a
CUDA build and a CUDA toolkit is found, or when IMAML_EXT_FORCE_CUDA=1 (which
makes a missing toolkit an error, so CI proves the CUDA code compiles on a
machine without a GPU). IMAML_EXT_NO_CUDA=1 skips them.

torch must already be installed: build with `pip install --no-build-isolation .`
so the extension is compiled against the torch it will run with.
"""

import filecmp
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _import_torch():
    """The torch of the environment being installed into.

    Under pip's default build isolation the build runs with that environment's
    interpreter but its site-packages hidden; a torch pip might install into
    the isolated environment would be another build than the one the
    extension will run with, so find the environment's own and use it.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
        probe = subprocess.run(
            [sys.executable, "-c", "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
            env=env, capture_output=True, text=True, check=False,
        )
        if probe.returncode != 0:
            sys.exit(
                "imaml_ext: torch must be installed before building this package: install torch, "
                "then `pip install --no-build-isolation .`"
            )
        sys.path.append(probe.stdout.strip())
        print(f"imaml_ext: building against the environment's torch in {probe.stdout.strip()}")
    import torch
    from torch.utils import cpp_extension

    return torch, cpp_extension


def _locate_cuda_home():
    """Sets CUDA_HOME (before torch reads it) to the toolkit nvcc belongs to.

    torch derives it from nvcc's directory, which is wrong when `nvcc` on the
    PATH is a wrapper script (e.g. /usr/local/bin/nvcc); nvcc itself knows.
    """
    if os.environ.get("CUDA_HOME") or shutil.which("nvcc") is None:
        return
    probe = subprocess.run(
        ["nvcc", "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True, check=False
    )
    for line in (probe.stdout + probe.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line.split("=", 1)[1].strip())
            if os.path.isfile(os.path.join(top, "include", "cuda_runtime_api.h")):
                os.environ["CUDA_HOME"] = top
            return


_locate_cuda_home()
torch, cpp_extension = _import_torch()


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _env_flag("IMAML_EXT_NO_CUDA"):
        return False
    if _env_flag("IMAML_EXT_FORCE_CUDA"):
        if cpp_extension.CUDA_HOME is None:
            sys.exit("imaml_ext: IMAML_EXT_FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        if torch.version.cuda is None:
            sys.exit("imaml_ext: IMAML_EXT_FORCE_CUDA=1 but this torch is not a CUDA build")
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _wheel_cuda_include_flags():
    """Headers that torch's CUDA headers include (cusparse.h, cublas_v2.h, ...)
    ship in the nvidia pip wheels rather than in a bare nvcc install. Searched
    after every other directory (-idirafter): the wheels' copies of the
    toolkit's own headers are incomplete and must not shadow it."""
    toolkit_include = os.path.join(cpp_extension.CUDA_HOME or "", "include")
    if os.path.isfile(os.path.join(toolkit_include, "cusparse.h")):
        return []
    dirs = []
    for entry in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for path in sorted(glob.glob(os.path.join(entry, pattern))):
                if os.path.isfile(os.path.join(path, "cusparse.h")) or os.path.isfile(
                    os.path.join(path, "cublas_v2.h")
                ):
                    dirs.append(path)
    return [flag for d in dict.fromkeys(dirs) for flag in ("-idirafter", d)]


def _extensions():
    with_cuda = _want_cuda()
    sources = [
        "csrc/imaml_ext.cpp",
        "csrc/tensor_lists.cpp",
        "csrc/cpu/ops_cpu.cpp",
        "csrc/cpu/batch_norm_relu_max_pool_cpu.cpp",
    ]
    # -fopenmp: at::parallel_for in the CPU kernels is OpenMP; without it they run on one thread.
    # -fno-trapping-math: lets the compiler turn the fused BatchNorm kernels' selects into vector blends (no
    # op here reads the floating-point exception flags).
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fdiagnostics-color=always"]
    link_flags = ["-fopenmp"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return [
            cpp_extension.CppExtension(
                "imaml_ext._C",
                sources,
                include_dirs=include_dirs,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ]
    # Ampere and Hopper machine code, and PTX so that newer GPUs can JIT it.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += ["csrc/cuda/ops_cuda.cpp", "csrc/cuda/kernels.cu", "csrc/cuda/batch_norm_relu_max_pool_cuda.cpp",
                "csrc/cuda/batch_norm_relu_max_pool.cu"]
    wheel_flags = _wheel_cuda_include_flags()
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    nvcc_flags += [f"-Xcompiler={a}" for a in wheel_flags]
    return [
        cpp_extension.CUDAExtension(
            "imaml_ext._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros + [("IMAML_EXT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags + wheel_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    ]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, then a check that the extension uses the process's libstdc++.

    A compiler configured to link libstdc++ statically puts a second copy of
    std::ostream into the extension. Next to torch's (shared) libstdc++ that copy
    segfaults the first time the extension formats a number into an error
    message (seen with /opt/gcc on the GPU machines; the system g++ is fine), so
    such a build is refused here instead of crashing a user's first bad call.

    An editable install (``pip install --no-build-isolation -e .``, what ``make``
    runs) compiles into build/ as ``setup.py build_ext --inplace`` does, not into
    a fresh temporary folder, so ninja recompiles only what changed; and the
    built extension replaces the one in the package atomically, so a process
    that has the old one loaded keeps running instead of reading a half-written file.
    """

    def finalize_options(self):
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            self.build_temp = os.path.join(
                ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            )

    def copy_file(self, infile, outfile, *args, **kwargs):
        """A new file renamed over the old one (a new inode), never the old one rewritten in place."""
        if os.path.isdir(outfile):
            outfile = os.path.join(outfile, os.path.basename(infile))
        if os.path.exists(outfile) and filecmp.cmp(infile, outfile, shallow=False):
            return outfile, 0
        partial = f"{outfile}.{os.getpid()}.partial"
        shutil.copy2(infile, partial)
        os.replace(partial, outfile)
        return outfile, 1

    def build_extension(self, ext):
        super().build_extension(ext)
        nm = shutil.which("nm")
        path = self.get_ext_fullpath(ext.name)
        if nm is None or not os.path.exists(path):
            return
        symbols = subprocess.run([nm, "--defined-only", path], capture_output=True, text=True).stdout
        if "_ZNSo9_M_insertIlEERSoT_" in symbols:
            os.remove(path)
            compiler = os.environ.get("CXX", "c++")
            raise RuntimeError(
                f"{path}: the C++ compiler (CXX={compiler}) linked its own copy of libstdc++ into the "
                "extension (it defines std::ostream::_M_insert), which crashes next to torch's libstdc++. "
                "Build with the system compiler, e.g. CC=/usr/bin/gcc CXX=/usr/bin/g++."
            )


setup(
    name="imaml_ext",
    version="0.1.0",
    description="Implicit MAML for PyTorch with fused C++/CUDA kernels and a Betty-compatible API",
    packages=find_packages(include=["imaml_ext", "imaml_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "tensorboard": ["tensorboard"],
        "data": ["Pillow", "learn2learn", "tqdm"],
        "train": ["Pillow", "tqdm", "matplotlib"],
    },
    entry_points={"console_scripts": ["imaml-train = imaml_ext.train:main"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
