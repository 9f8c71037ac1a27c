// kiln-img resize: grow (or, for raw, shrink with --shrink) the virtual disk.
#include <fmt/format.h>
#include <getopt.h>
#include <unistd.h>

#include "base/errors.h"
#include "img/common.h"

namespace kiln::img {

int cmd_resize(int argc, char** argv) {
  std::string fmt;
  bool shrink = false, quiet = false;
  optind = 1;
  static const option kLong[] = {{"shrink", no_argument, nullptr, 'S'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  // A size like "-1G" must not be taken for an option: stop at the first non-option.
  for (int c; (c = getopt_long(argc, argv, "+:f:hq", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'f':
        fmt = optarg;
        break;
      case 'q':
        quiet = true;
        break;
      case 'S':
        shrink = true;
        break;
      default:
        throw UsageError("Invalid option or missing argument for resize");
    }
  }
  if (argc - optind != 2) throw UsageError("Expecting image file name and size");
  const std::string file = argv[optind];
  std::string size_text = argv[optind + 1];
  int sign = 0;
  if (!size_text.empty() && (size_text[0] == '+' || size_text[0] == '-')) {
    sign = size_text[0] == '+' ? 1 : -1;
    size_text.erase(0, 1);
  }
  uint64_t amount;
  try {
    amount = block::qcow2::parse_size(size_text);
  } catch (const std::exception&) {
    throw UsageError("Invalid image size specified");
  }
  if (fmt.empty()) fmt = block::qcow2::probe_format(file);
  auto opts = read_options(fmt, false);
  opts.read_only = false;
  auto image = block::qcow2::open_image(file, opts);
  const uint64_t current = image->size();
  uint64_t target = amount;
  if (sign > 0) target = current + amount;
  if (sign < 0) {
    if (amount > current) throw UsageError("New image size must be positive");
    target = current - amount;
  }
  if (target < current && !shrink) {
    throw UsageError(
        "Use the --shrink option to perform a shrink operation.\n"
        "kiln-img: warning: Shrinking an image will delete all data beyond the shrunken image's "
        "end. Before performing such an operation, make sure there is no important data there.");
  }
  if (auto* q = dynamic_cast<block::qcow2::Image*>(image.get())) {
    q->resize(target);
  } else {
    auto* raw = dynamic_cast<block::qcow2::RawImage*>(image.get());
    if (::ftruncate(raw->fd(), off_t(target)) != 0) throw_errno("ftruncate");
  }
  if (!quiet) fmt::print("Image resized.\n");
  return 0;
}

}  // namespace kiln::img
