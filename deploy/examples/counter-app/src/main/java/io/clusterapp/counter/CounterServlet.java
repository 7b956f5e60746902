package io.clusterapp.counter;

import java.io.IOException;
import java.io.PrintWriter;
import java.util.logging.Logger;

import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import jakarta.servlet.http.HttpSession;

/**
 * GET /counter/ increments the session attribute {@code count} and shows it.
 * setAttribute on every request is what makes DeltaManager replicate it.
 */
public class CounterServlet extends HttpServlet {
    private static final long serialVersionUID = 1L;
    /** To the console (`kubectl logs`), unlike ServletContext.log's file. */
    private static final Logger LOG = Logger.getLogger(CounterServlet.class.getName());

    @Override
    protected void doGet(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        HttpSession session = req.getSession(true);
        String requested = req.getRequestedSessionId();
        if (session.isNew() && requested != null) {
            // The user's state is gone: a cookie named a session this node
            // could not find. Logged for whoever must find out why; a short
            // prefix only, since a whole session id is a credential.
            LOG.warning("requested session " + shortId(requested) + " not found on this node; new session "
                    + shortId(session.getId()));
        }
        // A browser sends a session's requests in parallel: without the
        // lock two of them can read the same count and one increment is
        // lost. Tomcat hands every request of a session on this node the
        // same facade object.
        int count;
        synchronized (session) {
            Integer previous = (Integer) session.getAttribute("count");
            count = previous == null ? 1 : previous + 1;
            session.setAttribute("count", Integer.valueOf(count));
        }

        String route = Route.jvmRoute();
        resp.setHeader("X-Counter", Integer.toString(count));
        resp.setHeader("X-Route", route);
        resp.setHeader("X-Session-Id", session.getId());
        resp.setHeader("Cache-Control", "no-store");
        resp.setContentType("text/html;charset=UTF-8");
        PrintWriter out = resp.getWriter();
        out.println("<!doctype html><html><head><title>counter</title></head><body>");
        out.println("<h1>Tambah = " + count + "</h1>");
        out.println("<p>node: " + escape(route) + "</p>");
        out.println("</body></html>");
    }

    /** The first 8 characters and the route: enough to match a report. */
    static String shortId(String id) {
        int dot = id.indexOf('.');
        String base = dot < 0 ? id : id.substring(0, dot);
        String route = dot < 0 ? "" : id.substring(dot);
        return base.substring(0, Math.min(8, base.length())) + "..." + route;
    }

    private static String escape(String s) {
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;");
    }
}
