// A minimal check macro for the torch-free C++ tests (ctest): print and count failures.
#pragma once
#include <cstdio>

static int g_failures = 0;
#define CHECK(cond)                                                         \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::printf("%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                         \
    }                                                                       \
  } while (0)
#define CHECK_NEAR(a, b, tol)                                                                      \
  do {                                                                                             \
    const double a_ = (a), b_ = (b);                                                               \
    if (!(a_ - b_ <= (tol) && b_ - a_ <= (tol))) {                                                 \
      std::printf("%s:%d: %s = %.17g, expected %.17g (tol %g)\n", __FILE__, __LINE__, #a, a_, b_, \
                  double(tol));                                                                    \
      ++g_failures;                                                                                \
    }                                                                                              \
  } while (0)
#define TEST_MAIN_END                                          \
  std::printf("%s: %d failure(s)\n", __FILE__, g_failures); \
  return g_failures == 0 ? 0 : 1;
