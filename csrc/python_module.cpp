// The Python extension module retina_fast._C: importing it runs the static registrations
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) of every other translation unit. Not part of the
// CMake library, which has no Python dependency.
#ifdef RETINA_FAST_PYTHON_MODULE
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
