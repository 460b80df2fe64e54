/* Decode one window of a JPEG: the rows and columns a train crop needs, and no more.
 *
 * libjpeg-turbo's jpeg_skip_scanlines and jpeg_crop_scanline (what tf.data's
 * decode_and_crop_jpeg uses) skip the inverse DCT, upsampling and colour conversion outside
 * the window, and the rows below it are never read. Compiled on first use by
 * jpeg_window.py and called through ctypes; it needs only libjpeg's header and library.
 *
 * Any error or warning (corrupt data, CMYK) returns -1 with libjpeg's message: the caller
 * then decodes the whole image as before, so nothing is lost.
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define RGB 3

struct window_error {
  struct jpeg_error_mgr manager;
  jmp_buf jump;
  char *message; /* JMSG_LENGTH_MAX bytes, the caller's */
};

static void stop(j_common_ptr cinfo) {
  struct window_error *error = (struct window_error *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, error->message);
  longjmp(error->jump, 1);
}

/* Warnings (level -1) stop too, as simplejpeg's strict mode does; trace messages pass. */
static void on_message(j_common_ptr cinfo, int level) {
  if (level < 0) stop(cinfo);
}

/* Writes the window (x, y, width, height) of the image decoded at scale 1/scale_denom, as
 * RGB rows of width * 3 bytes, into out. The fast integer DCT, as tf.data's INTEGER_FAST.
 * Returns 0, or -1 with message filled. */
int jpeg_window_decode(const unsigned char *data, unsigned long size, int scale_denom, int x,
                       int y, int width, int height, unsigned char *out, char *message) {
  struct jpeg_decompress_struct cinfo;
  struct window_error error;
  JSAMPLE *volatile row = NULL;
  cinfo.err = jpeg_std_error(&error.manager);
  error.manager.error_exit = stop;
  error.manager.emit_message = on_message;
  error.message = message;
  if (setjmp(error.jump)) {
    jpeg_destroy_decompress(&cinfo);
    free(row);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  cinfo.dct_method = JDCT_IFAST;
  cinfo.scale_num = 1;
  cinfo.scale_denom = (unsigned int)scale_denom;
  jpeg_start_decompress(&cinfo);
  if (x < 0 || y < 0 || width < 1 || height < 1 ||
      (JDIMENSION)(x + width) > cinfo.output_width ||
      (JDIMENSION)(y + height) > cinfo.output_height) {
    snprintf(message, JMSG_LENGTH_MAX, "window %d,%d %dx%d outside the %ux%u image", x, y,
             width, height, cinfo.output_width, cinfo.output_height);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  /* The decoded columns start at the iMCU boundary at or left of x. */
  JDIMENSION left = (JDIMENSION)x, span = (JDIMENSION)width;
  jpeg_crop_scanline(&cinfo, &left, &span);
  row = malloc((size_t)span * RGB);
  if (row == NULL) {
    snprintf(message, JMSG_LENGTH_MAX, "out of memory for a %u pixel row", span);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  if (y > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y);
  for (int r = 0; r < height; r++) {
    JSAMPROW rows[1] = {row};
    jpeg_read_scanlines(&cinfo, rows, 1);
    memcpy(out + (size_t)r * width * RGB, row + (size_t)(x - (int)left) * RGB,
           (size_t)width * RGB);
  }
  jpeg_destroy_decompress(&cinfo); /* the rows below the window are never decoded */
  free(row);
  return 0;
}
