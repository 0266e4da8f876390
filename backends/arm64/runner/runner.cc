// qcompile arm64 runner: load a Relax VM library (model.so) with the stock TVM runtime,
// run "main" on inputs read from .npy files, write every output as a .npy file.
//
//   usage: runner MODEL.so OUT_DIR IN_0.npy [IN_1.npy ...]
//   writes OUT_DIR/output_0.npy, OUT_DIR/output_1.npy, ... (one per element of main's
//   result tuple, in order) and prints one line per output: "output_<i> <dtype> <shape>".
//
// Needs only libtvm_ffi.so and libtvm_runtime.so at run time (link with --no-as-needed so
// the runtime, which registers the library loader, is really loaded). Inputs must be
// C-ordered little-endian .npy (format 1.x/2.x/3.x) of bool, int8/16/32/64, uint8/16/32/64,
// float16/32/64. Exit status: 0 ok, 1 bad usage or I/O, 2 a TVM error.
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr int kPooledAllocator = 2;

struct CpuAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    if (t->data == nullptr) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct DtypeName {
  const char* descr;  // numpy descr without the byte-order character
  DLDataType dtype;
};

const DtypeName kDtypes[] = {
    {"b1", {kDLBool, 8, 1}},     {"i1", {kDLInt, 8, 1}},      {"i2", {kDLInt, 16, 1}},
    {"i4", {kDLInt, 32, 1}},     {"i8", {kDLInt, 64, 1}},     {"u1", {kDLUInt, 8, 1}},
    {"u2", {kDLUInt, 16, 1}},    {"u4", {kDLUInt, 32, 1}},    {"u8", {kDLUInt, 64, 1}},
    {"f2", {kDLFloat, 16, 1}},   {"f4", {kDLFloat, 32, 1}},   {"f8", {kDLFloat, 64, 1}},
};

DLDataType ParseDescr(std::string descr, const std::string& path) {
  if (!descr.empty() && (descr[0] == '<' || descr[0] == '|' || descr[0] == '=')) descr = descr.substr(1);
  for (const auto& d : kDtypes) {
    if (descr == d.descr) return d.dtype;
  }
  throw std::runtime_error(path + ": unsupported or big-endian dtype '" + descr + "'");
}

std::string DescrOf(DLDataType dtype) {
  for (const auto& d : kDtypes) {
    if (d.dtype.code == dtype.code && d.dtype.bits == dtype.bits && dtype.lanes == 1) {
      return std::string(d.dtype.bits == 8 ? "|" : "<") + d.descr;
    }
  }
  throw std::runtime_error("output has a dtype with no .npy equivalent");
}

// Value of 'key': in the npy header dict (a Python literal), as raw text.
std::string HeaderField(const std::string& header, const std::string& key, const std::string& path) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error(path + ": npy header has no '" + key + "'");
  at = header.find(':', at) + 1;
  while (at < header.size() && header[at] == ' ') ++at;
  size_t end = at;
  if (header[at] == '\'') {
    end = header.find('\'', at + 1) + 1;
  } else if (header[at] == '(') {
    end = header.find(')', at) + 1;
  } else {
    end = header.find_first_of(",}", at);
  }
  return header.substr(at, end - at);
}

std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  std::string inner = text.substr(1, text.size() - 2);
  std::stringstream ss(inner);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    shape.push_back(std::stoll(item));
  }
  return shape;
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint8_t b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    uint8_t b[4];
    in.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  }
  std::string header(header_len, '\0');
  in.read(&header[0], header_len);
  std::string descr = HeaderField(header, "descr", path);
  if (HeaderField(header, "fortran_order", path) != "False") {
    throw std::runtime_error(path + ": Fortran-ordered arrays are not supported");
  }
  DLDataType dtype = ParseDescr(descr.substr(1, descr.size() - 2), path);
  std::vector<int64_t> shape = ParseShape(HeaderField(header, "shape", path));
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CpuAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype,
                                           DLDevice{kDLCPU, 0});
  size_t bytes = ffi::GetDataSize(t);
  in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(bytes));
  if (static_cast<size_t>(in.gcount()) != bytes) throw std::runtime_error(path + ": truncated data");
  return t;
}

void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  std::ostringstream dict;
  dict << "{'descr': '" << DescrOf(t.dtype()) << "', 'fortran_order': False, 'shape': (";
  for (int64_t d : t.shape()) dict << d << ", ";
  dict << "), }";
  std::string header = dict.str();
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error(path + ": cannot write");
  out.write("\x93NUMPY\x01\x00", 8);
  uint16_t len = static_cast<uint16_t>(header.size());
  char le[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  out.write(le, 2);
  out << header;
  out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(ffi::GetDataSize(t)));
  if (!out) throw std::runtime_error(path + ": write failed");
}

std::vector<ffi::Tensor> Flatten(const ffi::Any& result) {
  std::vector<ffi::Tensor> outs;
  if (auto tensor = result.as<ffi::Tensor>()) {
    outs.push_back(*tensor);
  } else if (auto arr = result.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *arr) {
      auto t = item.as<ffi::Tensor>();
      if (!t) throw std::runtime_error("main returned a tuple element that is not a tensor");
      outs.push_back(*t);
    }
  } else {
    throw std::runtime_error("main returned neither a tensor nor a tuple of tensors");
  }
  return outs;
}

int Run(int argc, char** argv) {
  std::string model = argv[1];
  if (model.find('/') == std::string::npos) model = "./" + model;  // dlopen searches bare names
  ffi::Module lib = ffi::Module::LoadFromFile(model);
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  ffi::Function main_fn = vm->GetFunction("main").value();
  std::vector<ffi::Any> args;
  for (int i = 3; i < argc; ++i) args.emplace_back(ReadNpy(argv[i]));
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  ffi::Any result;
  main_fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
  std::vector<ffi::Tensor> outs = Flatten(result);
  for (size_t i = 0; i < outs.size(); ++i) {
    std::string name = "output_" + std::to_string(i);
    WriteNpy(std::string(argv[2]) + "/" + name + ".npy", outs[i]);
    std::cout << name << " " << DescrOf(outs[i].dtype()) << " (";
    for (int64_t d : outs[i].shape()) std::cout << d << ",";
    std::cout << ")\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.so OUT_DIR [IN_0.npy ...]\n";
    return 1;
  }
  try {
    return Run(argc, argv);
  } catch (const ffi::Error& err) {
    std::cerr << "runner: TVM error: " << err.what() << "\n";
    return 2;
  } catch (const std::exception& err) {
    std::cerr << "runner: error: " << err.what() << "\n";
    return 1;
  }
}
