// Tests of csrc/common/num_view.h: the checked conversions from strided, typed 1-D views.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/num_view.h"

using ponder::DType;
using ponder::NumView;
using ponder::to_bools;
using ponder::to_finite_doubles;
using ponder::to_ints;

namespace {

constexpr int64_t kI64Min = std::numeric_limits<int64_t>::min();
constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();

// The what() of the std::invalid_argument that `f` throws ("" if it throws nothing).
template <typename F>
std::string invalid_argument_of(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

// A view of every other element of `v` (stride 2 * sizeof(T)): v[0], v[2], ...
template <typename T>
NumView every_other(const std::vector<T>& v, DType t) {
  return NumView(v.data(), static_cast<int64_t>((v.size() + 1) / 2), 2 * static_cast<int64_t>(sizeof(T)), t);
}

// Interleave `values` with a poison value that a stride bug would pick up.
template <typename T>
std::vector<T> interleave(const std::vector<T>& values, T poison) {
  std::vector<T> out;
  for (T x : values) {
    out.push_back(x);
    out.push_back(poison);
  }
  return out;
}

template <typename T>
void check_integer_dtype(DType expected) {
  using L = std::numeric_limits<T>;
  const std::vector<T> v{L::min(), static_cast<T>(0), static_cast<T>(1), L::max()};
  const NumView view = NumView::of(v);
  CHECK(view.dtype == expected);
  CHECK(view.size == 4);
  CHECK(view.stride == static_cast<int64_t>(sizeof(T)));
  CHECK(view.ndim == 1);

  // (uint64 has its own test case: its max is above int64 max.)
  const std::vector<int64_t> want{static_cast<int64_t>(L::min()), 0, 1, static_cast<int64_t>(L::max())};
  {
    CHECK(to_ints(view, "x", kI64Min, kI64Max) == want);
    // Strided: the poison (1) between the values must not show up.
    const std::vector<T> wide = interleave(v, static_cast<T>(1));
    const NumView strided = every_other(wide, expected);
    CHECK(strided.size == 4);
    CHECK(to_ints(strided, "x", kI64Min, kI64Max) == want);
    // Bounds are inclusive: exactly [min, max] passes, one narrower fails on either end.
    CHECK(to_ints(view, "x", want.front(), want.back()) == want);
    if (want.back() > kI64Min + 1) {
      const std::string msg = invalid_argument_of([&] { to_ints(view, "x", want.front(), want.back() - 1); });
      CHECK(msg.find("x[3]") != std::string::npos);
      CHECK(msg.find("out of range") != std::string::npos);
    }
    {
      const std::string msg = invalid_argument_of([&] { to_ints(view, "x", want.front() + 1, want.back()); });
      CHECK(msg.find("x[0]") != std::string::npos);
    }
    // Every integer dtype is also a real dtype and may carry 0/1 booleans.
    const std::vector<double> dv = to_finite_doubles(view, "d");
    REQUIRE(dv.size() == 4);
    CHECK(dv[0] == static_cast<double>(L::min()));
    CHECK(dv[3] == static_cast<double>(L::max()));
    CHECK(to_finite_doubles(strided, "d") == dv);
    const std::vector<T> bits{0, 1, 1, 0};
    CHECK(to_bools(NumView::of(bits), "b") == std::vector<uint8_t>{0, 1, 1, 0});
    const std::vector<T> wide_bits = interleave(bits, static_cast<T>(7));
    CHECK(to_bools(every_other(wide_bits, expected), "b") == std::vector<uint8_t>{0, 1, 1, 0});
    const std::vector<T> two{0, 2};
    CHECK(invalid_argument_of([&] { to_bools(NumView::of(two), "b"); }).find("b[1] = 2") != std::string::npos);
    if (L::is_signed) {
      const std::vector<T> minus{static_cast<T>(-1)};
      CHECK(invalid_argument_of([&] { to_bools(NumView::of(minus), "b"); }).find("b[0] = -1") !=
            std::string::npos);
    }
  }
}

}  // namespace

TEST_CASE("num_view: dtype helpers") {
  CHECK(std::string(ponder::dtype_name(DType::Bool)) == "bool");
  CHECK(std::string(ponder::dtype_name(DType::I8)) == "int8");
  CHECK(std::string(ponder::dtype_name(DType::I16)) == "int16");
  CHECK(std::string(ponder::dtype_name(DType::I32)) == "int32");
  CHECK(std::string(ponder::dtype_name(DType::I64)) == "int64");
  CHECK(std::string(ponder::dtype_name(DType::U8)) == "uint8");
  CHECK(std::string(ponder::dtype_name(DType::U16)) == "uint16");
  CHECK(std::string(ponder::dtype_name(DType::U32)) == "uint32");
  CHECK(std::string(ponder::dtype_name(DType::U64)) == "uint64");
  CHECK(std::string(ponder::dtype_name(DType::F32)) == "float32");
  CHECK(std::string(ponder::dtype_name(DType::F64)) == "float64");
  CHECK(std::string(ponder::dtype_name(DType::Other)) == "unsupported");

  for (DType d : {DType::I8, DType::I16, DType::I32, DType::I64, DType::U8, DType::U16, DType::U32, DType::U64}) {
    CHECK(ponder::is_integer(d));
    CHECK(ponder::is_real(d));
  }
  for (DType d : {DType::F32, DType::F64}) {
    CHECK_FALSE(ponder::is_integer(d));
    CHECK(ponder::is_real(d));
  }
  for (DType d : {DType::Bool, DType::Other}) {
    CHECK_FALSE(ponder::is_integer(d));
    CHECK_FALSE(ponder::is_real(d));
  }
  CHECK(NumView::of(std::vector<float>{1.f}).dtype == DType::F32);
  CHECK(NumView::of(std::vector<double>{1.0}).dtype == DType::F64);
  const NumView def;
  CHECK(def.size == 0);
  CHECK(def.ndim == 1);
}

TEST_CASE("num_view: to_ints over every integer dtype, contiguous and strided") {
  SUBCASE("int8") { check_integer_dtype<int8_t>(DType::I8); }
  SUBCASE("int16") { check_integer_dtype<int16_t>(DType::I16); }
  SUBCASE("int32") { check_integer_dtype<int32_t>(DType::I32); }
  SUBCASE("int64") { check_integer_dtype<int64_t>(DType::I64); }
  SUBCASE("uint8") { check_integer_dtype<uint8_t>(DType::U8); }
  SUBCASE("uint16") { check_integer_dtype<uint16_t>(DType::U16); }
  SUBCASE("uint32") { check_integer_dtype<uint32_t>(DType::U32); }
}

TEST_CASE("num_view: uint64 values above int64 max are range errors, never wrapped") {
  const uint64_t big = static_cast<uint64_t>(kI64Max);
  const std::vector<uint64_t> ok{0, 1, big};
  CHECK(to_ints(NumView::of(ok), "u", 0, kI64Max) == std::vector<int64_t>{0, 1, kI64Max});
  CHECK(to_ints(NumView::of(ok), "u", kI64Min, kI64Max) == std::vector<int64_t>{0, 1, kI64Max});

  for (uint64_t bad : {big + 1, std::numeric_limits<uint64_t>::max(), uint64_t{1} << 63 | 5}) {
    const std::vector<uint64_t> v{3, bad};
    const std::string msg = invalid_argument_of([&] { to_ints(NumView::of(v), "u", kI64Min, kI64Max); });
    // Named with its true value, as the Python reference does.
    CHECK(msg.find("u[1] = " + std::to_string(bad) + " is out of range") != std::string::npos);
    // Strided, with the huge value only in the gaps: it must not be read.
    const std::vector<uint64_t> gaps{3, bad, 4, bad};
    CHECK(to_ints(every_other(gaps, DType::U64), "u", 0, 10) == std::vector<int64_t>{3, 4});
    // ... and with the huge value in a visited element.
    const std::vector<uint64_t> hit{3, 0, bad, 0};
    CHECK_THROWS_AS(to_ints(every_other(hit, DType::U64), "u", 0, kI64Max), std::invalid_argument);
    // As booleans it is neither 0 nor 1.
    CHECK_THROWS_AS(to_bools(NumView::of(v), "b"), std::invalid_argument);
  }
  // A plain upper bound on uint64 values.
  const std::vector<uint64_t> v{5, 11};
  CHECK(invalid_argument_of([&] { to_ints(NumView::of(v), "u", 0, 10); }).find("u[1] = 11") != std::string::npos);
  // uint64 -> double keeps the magnitude (2^64 - 1 rounds to 2^64, which is finite).
  const std::vector<uint64_t> huge{std::numeric_limits<uint64_t>::max(), big + 1};
  const std::vector<double> d = to_finite_doubles(NumView::of(huge), "d");
  CHECK(d[0] == 18446744073709551616.0);
  CHECK(d[1] == 9223372036854775808.0);
  CHECK(to_bools(NumView::of(std::vector<uint64_t>{1, 0}), "b") == std::vector<uint8_t>{1, 0});
}

TEST_CASE("num_view: to_ints_as<int32_t> narrows checked values, contiguous and strided") {
  using ponder::to_ints_as;
  const int64_t lo = std::numeric_limits<int32_t>::min(), hi = std::numeric_limits<int32_t>::max();
  const std::vector<int64_t> v{lo, -1, 0, hi};
  CHECK(to_ints_as<int32_t>(NumView::of(v), "ids", lo, hi) == std::vector<int32_t>{INT32_MIN, -1, 0, INT32_MAX});
  const std::vector<int64_t> wide = interleave(v, int64_t{1} << 40);
  CHECK(to_ints_as<int32_t>(every_other(wide, DType::I64), "ids", lo, hi) ==
        std::vector<int32_t>{INT32_MIN, -1, 0, INT32_MAX});
  // The first bad element is named, contiguous or strided, whatever follows it.
  const std::vector<int64_t> bad{1, hi + 1, lo - 1, 2};
  CHECK(invalid_argument_of([&] { to_ints_as<int32_t>(NumView::of(bad), "ids", lo, hi); })
            .find("ids[1] = 2147483648 is out of range") != std::string::npos);
  const std::vector<int64_t> bad_wide = interleave(bad, int64_t{0});
  CHECK(invalid_argument_of([&] { to_ints_as<int32_t>(every_other(bad_wide, DType::I64), "ids", lo, hi); })
            .find("ids[1] = 2147483648") != std::string::npos);
  CHECK(invalid_argument_of([&] { to_ints_as<int32_t>(NumView::of(bad), "ids", 0, 1); }).find("ids[1]") !=
        std::string::npos);
  // Unsigned inputs against bounds above and below zero.
  const std::vector<uint32_t> u{5, 0xFFFFFFFFu};
  CHECK(to_ints_as<int64_t>(NumView::of(u), "u", 5, 0xFFFFFFFFll) == std::vector<int64_t>{5, 0xFFFFFFFFll});
  CHECK(invalid_argument_of([&] { to_ints_as<int32_t>(NumView::of(u), "u", 0, hi); }).find("u[1] = 4294967295") !=
        std::string::npos);
  CHECK(invalid_argument_of([&] { to_ints_as<int64_t>(NumView::of(u), "u", 6, kI64Max); }).find("u[0] = 5") !=
        std::string::npos);
  CHECK_THROWS_AS(to_ints_as<int64_t>(NumView::of(u), "u", -10, -1), std::invalid_argument);
  const std::vector<uint8_t> u8{0, 200};
  CHECK(to_ints_as<int32_t>(NumView::of(u8), "u", -5, 200) == std::vector<int32_t>{0, 200});
  CHECK_THROWS_AS(to_ints_as<int32_t>(NumView::of(u8), "u", -5, 199), std::invalid_argument);
  const std::vector<uint64_t> u64{uint64_t{1} << 63};
  CHECK(invalid_argument_of([&] { to_ints_as<int32_t>(NumView::of(u64), "u", 0, hi); })
            .find("u[0] = 9223372036854775808") != std::string::npos);
  // Every signed dtype through the int32 path, contiguous and strided.
  const std::vector<int8_t> i8{-128, 127};
  const std::vector<int16_t> i16{-32768, 32767};
  const std::vector<int32_t> i32{INT32_MIN, INT32_MAX};
  CHECK(to_ints_as<int32_t>(NumView::of(i8), "x", lo, hi) == std::vector<int32_t>{-128, 127});
  CHECK(to_ints_as<int32_t>(NumView::of(i16), "x", lo, hi) == std::vector<int32_t>{-32768, 32767});
  CHECK(to_ints_as<int32_t>(NumView::of(i32), "x", lo, hi) == std::vector<int32_t>{INT32_MIN, INT32_MAX});
  const std::vector<int16_t> i16w = interleave(i16, int16_t{7});
  CHECK(to_ints_as<int32_t>(every_other(i16w, DType::I16), "x", lo, hi) == std::vector<int32_t>{-32768, 32767});
  CHECK(to_ints_as<int32_t>(NumView(nullptr, 0, 4, DType::F32), "x", lo, hi).empty());
  CHECK_THROWS_AS(to_ints_as<int32_t>(NumView::of(std::vector<float>{1.f}), "x", lo, hi), std::invalid_argument);
}

TEST_CASE("num_view: to_ints rejects non-integer dtypes, non-1-D views; accepts empty views of any dtype") {
  const std::vector<double> f{1.0};
  CHECK(invalid_argument_of([&] { to_ints(NumView::of(f), "ids", 0, 10); }).find("ids must be an integer array, got dtype float64") !=
        std::string::npos);
  const std::vector<float> f32{1.0f};
  CHECK(invalid_argument_of([&] { to_ints(NumView::of(f32), "ids", 0, 10); }).find("float32") != std::string::npos);
  const std::vector<uint8_t> b{1};
  CHECK(invalid_argument_of([&] { to_ints(NumView(b.data(), 1, 1, DType::Bool), "ids", 0, 10); }).find("bool") !=
        std::string::npos);
  CHECK(invalid_argument_of([&] { to_ints(NumView(b.data(), 1, 1, DType::Other), "ids", 0, 10); }).find("unsupported") !=
        std::string::npos);

  // Empty arrays of any dtype, including ones that would otherwise be rejected.
  for (DType d : {DType::Bool, DType::I8, DType::I16, DType::I32, DType::I64, DType::U8, DType::U16, DType::U32,
                  DType::U64, DType::F32, DType::F64, DType::Other}) {
    CAPTURE(ponder::dtype_name(d));
    const NumView empty(nullptr, 0, 8, d);
    CHECK(to_ints(empty, "x", 0, 0).empty());
    CHECK(to_finite_doubles(empty, "x").empty());
    CHECK(to_bools(empty, "x").empty());
  }
  CHECK(to_ints(NumView::of(std::vector<int64_t>{}), "x", 5, 1).empty());  // even with an empty range

  // ndim != 1 is rejected first, even when empty.
  const std::vector<int64_t> v{1, 2, 3, 4};
  for (int nd : {0, 2, 3}) {
    CAPTURE(nd);
    const NumView m(v.data(), 4, 8, DType::I64, nd);
    CHECK(invalid_argument_of([&] { to_ints(m, "ids", 0, 10); }).find("ids must be a 1-D array, got " + std::to_string(nd)) !=
          std::string::npos);
    CHECK_THROWS_AS(to_finite_doubles(m, "s"), std::invalid_argument);
    CHECK_THROWS_AS(to_bools(m, "b"), std::invalid_argument);
    const NumView empty(nullptr, 0, 8, DType::F64, nd);
    CHECK_THROWS_AS(to_ints(empty, "ids", 0, 10), std::invalid_argument);
    CHECK_THROWS_AS(to_finite_doubles(empty, "s"), std::invalid_argument);
    CHECK_THROWS_AS(to_bools(empty, "b"), std::invalid_argument);
  }
}

TEST_CASE("num_view: negative strides and the first bad element is the one named") {
  const std::vector<int32_t> v{10, 20, 30, 40};
  const NumView reversed(v.data() + 3, 4, -static_cast<int64_t>(sizeof(int32_t)), DType::I32);
  CHECK(to_ints(reversed, "x", 0, 100) == std::vector<int64_t>{40, 30, 20, 10});
  CHECK(to_finite_doubles(reversed, "x") == std::vector<double>{40, 30, 20, 10});
  const std::string msg = invalid_argument_of([&] { to_ints(reversed, "x", 0, 25); });
  CHECK(msg.find("x[0] = 40") != std::string::npos);
  CHECK(msg.find("[0, 25]") != std::string::npos);
  const std::vector<int16_t> w{0, 5, 9, -3};
  CHECK(invalid_argument_of([&] { to_ints(NumView::of(w), "w", 0, 8); }).find("w[2] = 9") != std::string::npos);
}

TEST_CASE("num_view: to_finite_doubles over float dtypes, NaN and infinities") {
  const std::vector<float> f{-1.5f, 0.0f, 3.25f, std::numeric_limits<float>::max(),
                             std::numeric_limits<float>::denorm_min()};
  const std::vector<double> got = to_finite_doubles(NumView::of(f), "s");
  REQUIRE(got.size() == f.size());
  for (size_t i = 0; i < f.size(); ++i) CHECK(got[i] == static_cast<double>(f[i]));
  const std::vector<float> fw = interleave(f, std::numeric_limits<float>::quiet_NaN());
  CHECK(to_finite_doubles(every_other(fw, DType::F32), "s") == got);

  const std::vector<double> d{-1e308, 0.1, -0.0, 1e308, std::numeric_limits<double>::denorm_min()};
  CHECK(to_finite_doubles(NumView::of(d), "s") == d);
  const std::vector<double> dw = interleave(d, std::numeric_limits<double>::infinity());
  CHECK(to_finite_doubles(every_other(dw, DType::F64), "s") == d);

  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                     -std::numeric_limits<double>::infinity()}) {
    CAPTURE(bad);
    const std::vector<double> v{1.0, 2.0, bad};
    const std::string msg = invalid_argument_of([&] { to_finite_doubles(NumView::of(v), "step_scores"); });
    CHECK(msg.find("step_scores[2]") != std::string::npos);
    CHECK(msg.find("not finite") != std::string::npos);
    const std::vector<float> vf{static_cast<float>(bad)};
    CHECK(invalid_argument_of([&] { to_finite_doubles(NumView::of(vf), "s"); }).find("s[0]") != std::string::npos);
    // The bad value hit through a stride.
    const std::vector<double> hit{1.0, 0.0, bad, 0.0};
    CHECK_THROWS_AS(to_finite_doubles(every_other(hit, DType::F64), "s"), std::invalid_argument);
  }
  // Floats are neither integers nor booleans; bool is not real.
  CHECK_THROWS_AS(to_ints(NumView::of(d), "x", kI64Min, kI64Max), std::invalid_argument);
  CHECK(invalid_argument_of([&] { to_bools(NumView::of(d), "finished"); }).find("finished must be a boolean array, got dtype float64") !=
        std::string::npos);
  const std::vector<uint8_t> b{0, 1};
  CHECK(invalid_argument_of([&] { to_finite_doubles(NumView(b.data(), 2, 1, DType::Bool), "s"); })
            .find("s must be a real-valued array, got dtype bool") != std::string::npos);
  CHECK_THROWS_AS(to_finite_doubles(NumView(b.data(), 2, 1, DType::Other), "s"), std::invalid_argument);
}

TEST_CASE("num_view: to_bools over bool views (uint8 storage with DType::Bool)") {
  const std::vector<uint8_t> raw{0, 1, 1, 0, 1};
  const NumView b(raw.data(), 5, 1, DType::Bool);
  CHECK(to_bools(b, "finished") == raw);
  // numpy's bool is one byte; any non-zero byte reads as true.
  const std::vector<uint8_t> odd{0, 2, 255};
  CHECK(to_bools(NumView(odd.data(), 3, 1, DType::Bool), "finished") == std::vector<uint8_t>{0, 1, 1});
  // Strided bools.
  const std::vector<uint8_t> wide{1, 9, 0, 9, 1, 9};
  CHECK(to_bools(NumView(wide.data(), 3, 2, DType::Bool), "finished") == std::vector<uint8_t>{1, 0, 1});
  CHECK(to_bools(NumView::of(std::vector<uint8_t>{1, 0}), "finished") == std::vector<uint8_t>{1, 0});
  CHECK_THROWS_AS(to_bools(NumView(raw.data(), 5, 1, DType::Other), "finished"), std::invalid_argument);
  CHECK_THROWS_AS(to_bools(NumView::of(std::vector<float>{1.0f}), "finished"), std::invalid_argument);
}

TEST_CASE("num_view: element accessors") {
  const std::vector<int8_t> i8{-128, 127};
  CHECK(NumView::of(i8).i64(0) == -128);
  CHECK(NumView::of(i8).f64(1) == 127.0);
  const std::vector<uint64_t> u{std::numeric_limits<uint64_t>::max()};
  CHECK(NumView::of(u).i64(0) == kI64Max);  // saturates
  CHECK(NumView::of(u).f64(0) == 18446744073709551616.0);
  const std::vector<double> d{2.5};
  CHECK(NumView::of(d).f64(0) == 2.5);
}
